"""Benchmarks (see bench/README.md). A package, so that `bench.common` and
`celery -A bench.celery_floor` resolve to this directory."""
