"""Example models shipped with ispc (installed as ``ispc.examples``), for demos and benchmarks."""
