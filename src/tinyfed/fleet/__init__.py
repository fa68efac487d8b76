"""A simulated fleet of devices: per-client profiles (compute, links, energy, availability) and
the simulated clock that times each task from them (`tinyfed.runtimes.simulated`)."""
