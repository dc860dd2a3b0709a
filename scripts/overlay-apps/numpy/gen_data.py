"""Install step: generate the app's data files (deterministic).

- image.npy: a 1024x1024 float32 "photo" (smooth gradients + noise), the
  input of the filter;
- weights.npy: a 1024x1024 float32 projection matrix, the "model".
"""
import numpy as np

rng = np.random.default_rng(1)
y, x = np.mgrid[0:1024, 0:1024].astype(np.float32) / 1024.0
image = (np.sin(8 * x) * np.cos(5 * y) + 0.1 * rng.standard_normal((1024, 1024))).astype(np.float32)
np.save("image.npy", image)
weights = rng.standard_normal((1024, 1024)).astype(np.float32) / 32.0
np.save("weights.npy", weights)
print("wrote image.npy and weights.npy")
