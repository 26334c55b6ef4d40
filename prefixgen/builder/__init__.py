"""The build: planning (dedup, chunking, batching), prefill, and the pipeline that chains them."""
