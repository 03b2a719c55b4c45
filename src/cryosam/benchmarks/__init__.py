"""Benchmarks behind ``cryosam bench <name>``: each module defines ``register(app)``.

They print figures (time, throughput, peak memory); they never assert them.
"""
