"""Benchmarks behind ``cryosam bench <name>``: each module defines ``register(app)`` and is
listed in :data:`cryosam.commands.bench.BENCHMARKS`.

They print figures (time, throughput, peak memory); they never assert them.
"""
