"""Tests of pure logic: no processes, no network."""
