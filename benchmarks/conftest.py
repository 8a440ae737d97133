"""``pytest benchmarks --benchmark-enable``: the benchmark allocator settings first, while torch is not
imported yet (fastlm.bench.alloc; ``fastlm bench`` applies the same)."""
from fastlm.bench.alloc import set_allocator_defaults

set_allocator_defaults()
