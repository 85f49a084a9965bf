"""CPU paged attention vs gather + SDPA: python bench/kernels.py --help"""
from kevlarflow.bench.kernels import main

if __name__ == "__main__":
    main()
