"""Benchmarks of the taskgate gateway against a naive gateway, raw Celery and Flower.

Run everything with ``python -m bench`` (``--quick`` for a short smoke run). Every run
creates a private PostgreSQL database and a private ``redis-server`` and removes both.
"""
