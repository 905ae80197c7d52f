"""The paper's two-stage personalization: teach a backbone a subject from 3-5 images."""

from .adapter import PersonalizedBackbone, load_adapter, read_adapter_config
from .data import load_reference_images
from .recipe import TrainConfig, check_class_name, check_run, read_run, train
