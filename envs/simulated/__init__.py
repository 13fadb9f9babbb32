"""The calibrated generative simulator: run graphs without any LLM, fast and
deterministically, on task profiles calibrated to the papers' measurements."""

from graphtune.envs.simulated.profile import BUILTIN_PROFILES, ModelProfile, MixTarget, Profile, load_profile
from graphtune.envs.simulated.simulator import SimulatedEnvironment, Simulation

__all__ = ["BUILTIN_PROFILES", "MixTarget", "ModelProfile", "Profile", "SimulatedEnvironment", "Simulation",
           "load_profile"]
