"""Loading across layouts: a client at one tensor-, pipeline- or expert-parallel size
gathers its tensors from seed ranks of another (issue 25).

- ``slices``: where every element of a rank's tensor comes from in the whole
  (logical) tensor, derived from vLLM's layer classes and parameter attributes; a
  tensor it cannot describe exactly is refused by name.
- ``gather``: which seed rank's elements fill which of the client's, so that every
  element is filled exactly once and equals a disk load in the client's own layout.
"""
