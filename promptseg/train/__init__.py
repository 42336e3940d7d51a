"""Training stages (torch + open_clip): tiny CLIP pretraining; CAM methods follow."""
