"""vdit-sparse: sparse attention for video diffusion transformers in diffusers.

Public surface::

    accelerate_pipeline(pipe, profile) -> AccelerationHandle
    check_profile(pipe, profile) -> ResolvedProfile   (the same checks, changing nothing)
    Profile, load_profile, builtin_profiles, ProfileError

Importing ``vdit_sparse.kernels`` alone needs only torch and triton.
"""

__version__ = "0.1.0"

__all__ = ["accelerate_pipeline", "check_profile", "AccelerationHandle", "Profile", "ProfileError", "load_profile", "builtin_profiles"]


def __getattr__(name):
    # Lazy, so that `import vdit_sparse.kernels` does not pull in diffusers.
    if name in ("accelerate_pipeline", "check_profile", "AccelerationHandle"):
        from . import api

        return getattr(api, name)
    if name in ("Profile", "ProfileError", "load_profile", "builtin_profiles"):
        from . import profile

        return getattr(profile, name)
    raise AttributeError(f"module 'vdit_sparse' has no attribute {name!r}")
