"""Dataset tools: filter, inspect, validate, audit. No torch, Prefect or Ray."""
