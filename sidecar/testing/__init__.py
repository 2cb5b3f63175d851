"""Test doubles shipped with the package: fakes that run on real sockets for tests, benchmarks and demos."""
