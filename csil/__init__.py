"""The core library every service shares: typed configs, tasks, the robosuite env wrapper, observation specs,
robomimic HDF5 I/O, scripted experts, networks, the acting step, metrics. It imports no service."""
