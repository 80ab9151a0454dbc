"""The benchmark harness of outbox (`make bench`, `make bench-long`): measures, never asserts."""
