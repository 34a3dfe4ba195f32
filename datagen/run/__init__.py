"""Executors that run the steps: in-process, Ray actor pools, and Prefect orchestration."""
