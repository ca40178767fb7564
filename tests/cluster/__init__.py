"""Tests of the cluster templates, hostfile helpers and memory estimate."""
