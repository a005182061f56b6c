"""The model: Keras backends (TensorFlow, JAX) and how the softmax net is built and fitted."""
