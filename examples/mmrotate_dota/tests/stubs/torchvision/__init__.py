"""A stand-in for torchvision, for CPU tests only (see ../../README.md, "CPU smoke test").

MMRotate imports `torchvision.transforms` when it registers its models (for H2RBox-v2,
which the tests do not use). torchvision does not import beside the CPU torch wheel CI
uses, and nothing the smoke test runs needs it; the test puts this directory on
sys.path only when a real torchvision cannot be imported.
"""

# MMEngine's environment report prints torchvision's version.
__version__ = "0.0.0+freezesched-test-stub"
