"""Readers of foreign checkpoint formats (HF safetensors, GGUF).

Host-side only: these modules use numpy and never import JAX. They yield
`(hugging_face_tensor_name, np.ndarray)` pairs; mapping HF names onto the
engine's param pytree happens elsewhere.
"""
