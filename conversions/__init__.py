"""Checkpoint formats: readers of foreign formats (HF safetensors, GGUF) and `jaxpaged convert`.

The readers are host-side only: they use numpy and never import JAX, and yield
`(hugging_face_tensor_name, np.ndarray)` pairs; mapping HF names onto the engine's param pytree
happens in `jaxpaged.models.params`. `convert` and `orbax_loader` (the converted format, saved
and restored with orbax) are device side.
"""
