//! Image + text generation on tests/fixtures/multimodal (a tiny Llava exported by
//! optimum-executorch's multimodal exporter), against eager transformers' references
//! (tools/fixtures/make_multimodal.py); image preprocessing against transformers'
//! CLIPImageProcessor.

use std::ops::ControlFlow;
use std::path::PathBuf;

use etllm::media::image::{decode_file, ImagePreprocessor};
use etllm::multimodal::{ImageSource, Input};
use etllm::sampler::SamplerPlugin;
use etllm::{Error, GenerationConfig, Runner, RunnerOptions, StopReason};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multimodal")
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(name)).unwrap()).unwrap()
}

fn open() -> Runner {
    Runner::open(
        dir().join("model.pte"),
        dir().join("tokenizer.json"),
        RunnerOptions::default(),
    )
    .unwrap()
}

fn greedy(n: i32) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        temperature: 0.0,
        echo: false,
        num_bos: 0,
        ..Default::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The reference case's inputs: its text pieces as token ids, its images as files.
fn case_inputs(case: &Value) -> Vec<Input> {
    case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| match i["type"].as_str().unwrap() {
            "text" => Input::Tokens(ids(&i["token_ids"])),
            "image" => Input::image_file(dir().join(i["file"].as_str().unwrap())),
            other => panic!("unknown input type {other}"),
        })
        .collect()
}

fn case(name: &str) -> Value {
    json("reference.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn generate(runner: &mut Runner, inputs: &[Input], n: i32) -> etllm::Result<Vec<u32>> {
    let mut out = Vec::new();
    runner.generate_inputs(
        inputs,
        &greedy(n),
        |p| {
            out.extend(p.token);
            ControlFlow::Continue(())
        },
        |_| {},
    )?;
    Ok(out)
}

#[test]
fn one_image_greedy_tokens_match_eager_transformers() {
    let c = case("one_image");
    let mut runner = open();
    let got = generate(&mut runner, &case_inputs(&c), 16).unwrap();
    assert_eq!(got, ids(&c["greedy_ids"]));
    assert_eq!(
        runner.position(),
        c["prompt_len"].as_u64().unwrap() as usize + 16
    );
}

#[test]
fn two_images_greedy_tokens_match_eager_transformers() {
    let c = case("two_images");
    let mut runner = open();
    let got = generate(&mut runner, &case_inputs(&c), 16).unwrap();
    assert_eq!(got, ids(&c["greedy_ids"]));
}

/// Records the logits of the first pick.
struct FirstLogits(std::sync::Arc<std::sync::Mutex<Vec<f32>>>);

impl SamplerPlugin for FirstLogits {
    fn apply(&mut self, logits: &mut [f32], _history: &[u32]) -> etllm::Result<Option<u32>> {
        let mut first = self.0.lock().unwrap();
        if first.is_empty() {
            first.extend_from_slice(logits);
        }
        Ok(None)
    }
}

#[test]
fn first_step_logits_match_eager_transformers_within_1e_4() {
    let c = case("one_image");
    let mut runner = open();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    runner.set_sampler_plugin(Some(Box::new(FirstLogits(seen.clone()))));
    generate(&mut runner, &case_inputs(&c), 1).unwrap();
    let got = seen.lock().unwrap().clone();
    let want: Vec<f32> = c["first_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "max |diff| {worst}");
}

#[test]
fn text_inputs_with_bos_framing_give_the_same_tokens_as_ids() {
    let c = case("one_image");
    let tokenizer = etllm::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let pieces = c["inputs"].as_array().unwrap();
    // The first piece is "<s>USER: " with its BOS: here the text after "<s>", framed with
    // num_bos = 1.
    let first = pieces[0]["text"]
        .as_str()
        .unwrap()
        .trim_start_matches("<s>");
    let last = pieces[2]["text"].as_str().unwrap();
    assert_eq!(
        tokenizer.encode(last).unwrap(),
        ids(&pieces[2]["token_ids"])
    );
    let inputs = [
        Input::text(first),
        Input::image_file(dir().join("images/rgb.png")),
        Input::text(last),
    ];
    let mut runner = open();
    let mut out = Vec::new();
    runner
        .generate_inputs(
            &inputs,
            &GenerationConfig {
                num_bos: 1,
                ..greedy(16)
            },
            |p| {
                out.extend(p.token);
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(out, ids(&c["greedy_ids"]));
}

#[test]
fn features_and_decoded_pixels_give_the_same_tokens_as_the_file() {
    let c = case("one_image");
    let pre = &json("preprocess.json")["images"]["rgb.png"];
    let values: Vec<f32> = pre["pixel_values_chw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let mut with_features = case_inputs(&c);
    with_features[1] = Input::Features {
        sizes: vec![3, 32, 32],
        data: values,
    };
    let mut runner = open();
    assert_eq!(
        generate(&mut runner, &with_features, 16).unwrap(),
        ids(&c["greedy_ids"])
    );
    let mut with_pixels = case_inputs(&c);
    let pixels = decode_file(&dir().join("images/rgb.png")).unwrap();
    with_pixels[1] = Input::Image(ImageSource::Pixels(pixels));
    runner.reset().unwrap();
    assert_eq!(
        generate(&mut runner, &with_pixels, 16).unwrap(),
        ids(&c["greedy_ids"])
    );
}

#[test]
fn pixel_values_match_transformers_clip_image_processor() {
    let pre = ImagePreprocessor::from_file(&dir().join("preprocessor_config.json")).unwrap();
    let images = json("preprocess.json")["images"].clone();
    for (name, want) in images.as_object().unwrap() {
        let pixels = decode_file(&dir().join(want["file"].as_str().unwrap())).unwrap();
        let (got, w, h) = pre.pixel_values(&pixels);
        assert_eq!((w, h), (32, 32), "{name}");
        let want: Vec<f32> = want["pixel_values_chw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The image crate's JPEG decoder rounds a few pixels differently from Pillow's
        // libjpeg (0.03 here: two of 255 levels over CLIP's std); PNGs match exactly.
        let bound = if name.ends_with(".jpg") { 0.05 } else { 1e-5 };
        assert!(worst <= bound, "{name}: max |diff| {worst}");
    }
}

#[test]
fn resize_matches_pillow_to_the_byte() {
    let pre = ImagePreprocessor::from_file(&dir().join("preprocessor_config.json")).unwrap();
    let images = json("preprocess.json")["images"].clone();
    for name in ["rgb.png", "tall.png"] {
        let want = &images[name];
        let pixels = decode_file(&dir().join(want["file"].as_str().unwrap())).unwrap();
        let got = pre.resize_and_crop(&pixels);
        assert_eq!(
            got.data,
            ids(&want["cropped_hwc_uint8"])
                .into_iter()
                .map(|v| v as u8)
                .collect::<Vec<_>>(),
            "{name}"
        );
    }
}

fn assert_runner_still_works(runner: &mut Runner) {
    let c = case("one_image");
    runner.reset().unwrap();
    assert_eq!(
        generate(runner, &case_inputs(&c), 16).unwrap(),
        ids(&c["greedy_ids"])
    );
}

#[test]
fn bad_image_files_are_invalid_media_and_change_nothing() {
    let mut runner = open();
    generate(&mut runner, &[Input::Tokens(vec![1, 55, 53])], 2).unwrap();
    let before = runner.position();
    for bad in [
        "truncated.png",
        "corrupt.jpg",
        "image.tiff",
        "not_an_image.png",
    ] {
        let inputs = [
            Input::Tokens(vec![55]),
            Input::image_file(dir().join("images").join(bad)),
        ];
        match generate(&mut runner, &inputs, 4) {
            Err(Error::InvalidMedia { message, .. }) => {
                if bad == "image.tiff" {
                    assert!(message.contains("TIFF"), "{message}");
                }
            }
            other => panic!("{bad}: {other:?}"),
        }
        assert_eq!(runner.position(), before, "{bad}");
    }
    assert_runner_still_works(&mut runner);
}

#[test]
fn a_missing_image_file_is_a_file_access_error() {
    let mut runner = open();
    let err = generate(&mut runner, &[Input::image_file(dir().join("nope.png"))], 2).unwrap_err();
    assert!(matches!(err, Error::FileAccess { .. }), "{err:?}");
}

#[test]
fn an_image_for_a_text_only_model_is_unsupported_and_the_runner_stays_usable() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut runner = Runner::open(
        fixtures.join("dyn_xnnpack/model.pte"),
        fixtures.join("tokenizer.json"),
        RunnerOptions::default(),
    )
    .unwrap();
    let err = generate(
        &mut runner,
        &[
            Input::Tokens(vec![1, 5]),
            Input::image_file(dir().join("images/rgb.png")),
        ],
        2,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedModel(ref m) if m.contains("vision_encoder")),
        "{err:?}"
    );
    assert_eq!(runner.position(), 0);
    assert_eq!(
        generate(&mut runner, &[Input::Tokens(vec![1, 5])], 3)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn too_many_image_tokens_for_the_context_is_context_full_and_changes_nothing() {
    let mut runner = open();
    // 8 images of 16 rows fill 128 positions: with the text, more than the context holds.
    let mut inputs = vec![Input::Tokens(vec![1, 55])];
    inputs.extend((0..8).map(|_| Input::image_file(dir().join("images/rgb.png"))));
    let err = generate(&mut runner, &inputs, 4).unwrap_err();
    assert!(matches!(err, Error::ContextFull { .. }), "{err:?}");
    assert_eq!(runner.position(), 0);
    assert_runner_still_works(&mut runner);
}

#[test]
fn an_input_list_continues_the_conversation_and_a_prefill_ending_in_an_image_works() {
    let c = case("one_image");
    let inputs = case_inputs(&c);
    let mut runner = open();
    // Prefill the first text and the image, then generate from the last text.
    runner.prefill_inputs(&inputs[..2], &greedy(0)).unwrap();
    assert_eq!(runner.position(), 7 + 16);
    let got = generate(&mut runner, &inputs[2..], 16).unwrap();
    assert_eq!(got, ids(&c["greedy_ids"]));
}

#[test]
fn text_prompts_run_on_a_multimodal_export_through_its_token_embedding() {
    // The same prompt as token ids through `generate_from_ids` and as an input list gives
    // the same tokens: the synthesized forward chains token_embedding and text_decoder.
    let prompt = vec![1u32, 55, 53, 39, 52, 28, 223];
    let mut runner = open();
    let mut a = Vec::new();
    let stats = runner
        .generate_from_ids(
            &prompt,
            &greedy(8),
            |p| {
                a.extend(p.token);
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Length);
    runner.reset().unwrap();
    assert_eq!(
        generate(&mut runner, &[Input::Tokens(prompt)], 8).unwrap(),
        a
    );
}

#[test]
fn empty_input_lists_and_empty_texts_are_refused() {
    let mut runner = open();
    assert!(matches!(
        generate(&mut runner, &[], 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        generate(&mut runner, &[Input::text("")], 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        generate(&mut runner, &[Input::Tokens(vec![9999])], 2),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn features_of_the_wrong_shape_are_refused() {
    let mut runner = open();
    let err = generate(
        &mut runner,
        &[Input::Features {
            sizes: vec![3, 16, 16],
            data: vec![0.0; 768],
        }],
        2,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[test]
fn a_saved_state_with_an_image_restores_into_another_session() {
    let c = case("one_image");
    let inputs = case_inputs(&c);
    let mut runner = open();
    let mut first = runner.session().unwrap();
    first.prefill_inputs(&inputs[..2], &greedy(0)).unwrap();
    let state = first.save_state().unwrap();
    assert!(first.tokens().contains(&etllm::multimodal::MEDIA_POSITION));
    drop(first);
    let mut second = runner.session().unwrap();
    second.load_state(&state).unwrap();
    let mut out = Vec::new();
    second
        .generate_inputs(
            &inputs[2..],
            &greedy(16),
            |p| {
                out.extend(p.token);
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(out, ids(&c["greedy_ids"]));
}
