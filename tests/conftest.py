import os

# No GPU here: every Triton kernel runs on CPU tensors through the interpreter. This must be set
# before triton is first imported, so it lives at the top of conftest (imported before any test).
os.environ.setdefault("TRITON_INTERPRET", "1")
