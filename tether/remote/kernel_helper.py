"""PLACEHOLDER: replaced by the lifecycle work (in-notebook release)."""
def release() -> None:
    raise NotImplementedError
def load_ipython_extension(ipython: object) -> None:
    raise NotImplementedError
