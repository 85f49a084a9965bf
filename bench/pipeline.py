"""Throughput of pp=1, pp=2 and 2 instances, same run: python bench/pipeline.py --help"""
from kevlarflow.bench.pipeline import main

if __name__ == "__main__":
    main()
