"""The pictures eval.py draws on a few test images: DINOv2's PCA of the patch tokens, DINO's
attention maps, and the segmentation probe's masks over the image. Each is a strip of panels
in one PNG, the same test images for every backbone, so that two strips compare side by side.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data


def load_batch(rows, size):
    """Table rows -> preprocessed images (B, 1, S, S), as the backbone sees them."""
    return torch.stack([data.preprocess(data.load_image(row["image"]), size) for row in rows])


def gray_rgb(image):
    """A preprocessed (1, S, S) image, as the backbone saw it, back in [0, 1] as (S, S, 3)."""
    pixels = image[0].numpy() * data.STD + data.MEAN
    return np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=2)


def save_png(panels, path):
    """(H, W, 3) panels in [0, 1], side by side 4 px apart, as one 8-bit PNG."""
    gap = np.ones((panels[0].shape[0], 4, 3))
    spaced = []
    for panel in panels:
        spaced += [panel, gap]
    strip = np.concatenate(spaced[:-1], axis=1)
    Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8)).save(path)


def seg_picture(rows, predicted, true, size, png):
    """Each image with the truth in green and the prediction in red (both: yellow)."""
    panels = []
    for row, pred, mask in zip(rows, predicted, true):
        image = gray_rgb(load_batch([row], size)[0])
        overlay = np.stack([pred, mask, 0 * pred], -1)  # red, green
        panels.append(0.7 * image + 0.3 * overlay)
    save_png(panels, png)


@torch.inference_mode()
def pca_picture(model, rows, size, png):
    """DINOv2's figure (Oquab et al. 2023, figure 1): the first three principal components of
    the patch tokens of a few images, fitted on all of them at once so that a colour means
    the same in each, as RGB beside the image. A component's sign is arbitrary: colours may
    swap between backbones, the parts they draw may not."""
    images = load_batch(rows, size)
    device = next(model.parameters(), torch.empty(0)).device
    patch = model.forward_features(images.to(device))["patch"].double().cpu()  # (B, N, D)
    grid = math.isqrt(patch.shape[1])
    flat = patch.flatten(0, 1)  # (B*N, D)
    flat = flat - flat.mean(0)
    axes = torch.linalg.svd(flat, full_matrices=False)[2][:3]  # rows of V^T: (3, D)
    components = flat @ axes.T  # (B*N, 3)
    low = components.min(0).values
    high = components.max(0).values
    rgb = (components - low) / (high - low).clamp_min(1e-12)  # each component in [0, 1]
    rgb = rgb.reshape(len(rows), grid, grid, 3).permute(0, 3, 1, 2)  # (B, 3, g, g)
    rgb = F.interpolate(rgb, size=(size, size), mode="nearest").permute(0, 2, 3, 1)  # (B, S, S, 3)
    panels = []
    for image, picture in zip(images, rgb.numpy()):  # the images decoded once, for both
        panels += [gray_rgb(image), picture]
    save_png(panels, png)
    return {"png": str(png)}


@torch.inference_mode()
def attention_picture(model, rows, size, png):
    """DINO's attention maps (Caron et al. 2021, figure 1): for each image, the image and then
    one panel per head of the last block, the CLS query's attention over the patches, each
    stretched to [0, 1] and shown in gray at the image's size."""
    images = load_batch(rows, size)
    device = next(model.parameters()).device
    attention = model.last_cls_attention(images.to(device)).float().cpu()  # (B, H, N)
    grid = math.isqrt(attention.shape[2])
    maps = attention.reshape(len(rows), -1, grid, grid)  # (B, H, g, g)
    low = maps.amin((2, 3), keepdim=True)
    high = maps.amax((2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    maps = F.interpolate(maps, size=(size, size), mode="nearest")  # (B, H, S, S)
    panels = []
    for image, heads in zip(images, maps.numpy()):
        panels.append(gray_rgb(image))
        panels += [np.repeat(head[..., None], 3, axis=2) for head in heads]
    save_png(panels, png)
    return {"png": str(png), "heads": int(maps.shape[1])}
