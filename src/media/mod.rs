//! Media preprocessing for multimodal and speech models: image decoding and Hugging Face
//! image-processor preprocessing ([`image`]), WAV reading, resampling and Whisper's log-mel
//! features ([`audio`]). Pure functions of their inputs; the model is not involved.

pub mod audio;
pub mod image;
