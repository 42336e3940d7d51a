"""Datasets: the synthetic co-occurrence world, PASCAL VOC and COCO readers (numpy + Pillow only)."""
