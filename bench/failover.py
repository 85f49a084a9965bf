"""One failure under load, KevlarFlow vs restart: python bench/failover.py --help"""
from kevlarflow.bench.failover import main

if __name__ == "__main__":
    main()
