"""KevlarFlow vs transformers generate, offline throughput: python bench/throughput.py --help"""
from kevlarflow.bench.throughput import main

if __name__ == "__main__":
    main()
