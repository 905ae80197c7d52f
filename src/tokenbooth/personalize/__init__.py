"""The paper's two-stage personalization: teach a backbone a subject from 3-5 images (recipe.py reads top to
bottom)."""

from .adapter import PersonalizedBackbone, load_adapter, read_adapter_config
from .checks import check_class_name, check_run
from .config import TrainConfig
from .data import load_reference_images
from .recipe import train
from .run_folder import read_run
