"""The paged KV cache: `blocks` keeps the books (free, held and cached blocks, prefix keys), `cache` holds
the tensors and says where each forward writes and reads."""
