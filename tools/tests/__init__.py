"""Tests of tools/ (unittest; see tests/CMakeLists.txt for how CTest runs them)."""
