"""Communicator recovery latency (abort + shrink + first allreduce) on CPU gloo:
python bench/comm.py --help"""
from kevlarflow.bench.comm import main

if __name__ == "__main__":
    main()
