"""Prompt lists shipped with rebel-diffusion (one prompt a line); see rebel_diffusion.prompts_io."""
