//! The networks of StoryGPT-V: CLIP, UNet, VAE, schedulers, LLMs, mappers and the story pipeline.
