"""train.py's steps on either side of the LM: the ears before it, the voice after it, and the exam.

    step_units      speech -> units: a phone recogniser (the toy's default, phones.py) or HuBERT +
                    k-means, learnt from the training speech; units.jsonl for the whole corpus, and
                    how good the units are (PNMI, phone accuracy, one sentence in two voices)
    (the LM stages, stage0 to stage3, read units.jsonl: lm_stages.py)
    step_vocoder    units -> speech: the mel vocoder, learnt from the answer voice's training speech
    step_eval       the whole run on held-out data: ASR, TTS, spoken and typed questions, the vocoder

Each step is step_NAME(args, settings, report, corpus): it writes into the run directory (args.out)
and adds its numbers to `report`, which train.py saves as report.json.
"""
import json
import random
from pathlib import Path

from tqdm import tqdm

from speechgpt_min.audio import AudioError, load_audio
from speechgpt_min.data import in_split
from speechgpt_min.device import fast_bfloat16, resolve_device
from speechgpt_min.evaluate import (WHISPER_MISSING, cross_voice_similarity, evaluate_asr, evaluate_chain,
                                    evaluate_text_questions, evaluate_tts, evaluate_vocoder_speech, evenly_spaced,
                                    exact_match_accuracy, speech_whisper_wer, text_answers, unit_edit_distance,
                                    whisper_available)
from speechgpt_min.hubert import HubertConfig
from speechgpt_min.hubert_training import mfcc_features, train_unit_encoder
from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig
from speechgpt_min.phones import (PhoneRecognizerConfig, n_frames, normalised_mfcc, speed_perturbed,
                                  train_phone_recognizer)
from speechgpt_min.pipeline import PipelineError, SpeechGPT
from speechgpt_min.run_corpus import UserError
from speechgpt_min.units import dedup, frame_phones, read_segs, score_units, speech_to_units
from speechgpt_min.vocoder_training import train_mel_vocoder, vocoder_items


# ----------------------------------------------------------------------------- units: speech -> units

def load_wavs(data_dir, rows):
    try:
        return [load_audio(Path(data_dir) / row["audio"]) for row in rows]
    except AudioError as error:
        raise UserError(str(error)) from None


def step_units(args, settings, report, corpus):
    """The ears: a phone recogniser (the toy default) or HuBERT + k-means, learnt from the training
    speech; then units for the whole corpus (units.jsonl: what the LM learns from, some of it warped
    with warped_hearing) and the quality of the units as the ears hear them."""
    rows = corpus.rows
    print(f"units: loading {len(rows)} utterances from {args.data}")
    wavs = load_wavs(args.data, rows)
    train_rows = [(w, r) for w, r in zip(wavs, rows) if r["split"] == "train"]
    print(f"units: {len(train_rows)} training utterances, {sum(len(w) for w, _ in train_rows) / 16000 / 60:.1f} min")
    if settings["units"] == "phones":
        frame_units, recognizer = learn_phone_units(args, settings, train_rows, wavs, rows)
        names, lm_units = recognizer.config.phones, warped_hearing(args, settings, recognizer, wavs, rows, frame_units)
    else:
        frame_units, names = learn_hubert_units(args, settings, [w for w, _ in train_rows], wavs, rows, report)
        lm_units = frame_units
    with open(args.out / "units.jsonl", "w") as f:  # what the LM learns from
        for row, units in zip(rows, lm_units):
            merged_units, durations = (u.tolist() for u in dedup(units))
            f.write(json.dumps({"id": row["id"], "units": merged_units, "durations": durations}) + "\n")
    merged = {row["id"]: dedup(units)[0].tolist() for row, units in zip(rows, frame_units)}  # as the ears hear

    # Unit quality on held-out speech with phone alignments: the unseen voice, and the seen voices' test split.
    for split, suffix in (("test_unseen_voice", ""), ("test", "_seen_voices")):
        picked = [i for i, r in enumerate(rows) if r["split"] == split and r.get("alignment")]
        if picked:
            quality = score_units([frame_units[i] for i in picked], [args.data / rows[i]["alignment"] for i in picked])
            report[f"units.pnmi{suffix}"] = round(quality["pnmi"], 4)
            report[f"units.phone_purity{suffix}"] = round(quality["phone_purity"], 4)
            if names is not None:  # phone units: how often the recognised phone is festival's
                hits = [names[int(u)] == p for i in picked for u, p in
                        zip(frame_units[i], frame_phones(read_segs(args.data / rows[i]["alignment"]), len(frame_units[i])))]
                report[f"units.phone_accuracy{suffix}"] = round(sum(hits) / len(hits), 4)
    if names is not None:  # phone units, in every voice: how many of the text's phones they get wrong
        for split, suffix in (("test_unseen_voice", ""), ("test", "_seen_voices")):
            picked = [(frame_units[i], r["phones"]) for i, r in enumerate(rows) if r["split"] == split and r.get("phones")]
            if picked:
                report[f"units.phone_error_rate{suffix}"] = round(phone_error_rate(picked, names), 4)
    # Does a sentence read by two voices give alike units? (PNMI, on festival voices only, does not say.)
    similarity = cross_voice_similarity([(r["text"], r["voice"], merged[r["id"]]) for r in rows])
    if similarity is not None:
        report["units.cross_voice_same_text"] = round(similarity["same_text"], 4)
        report["units.cross_voice_other_text"] = rounded(similarity["other_text"])
    report["units.kind"], report["units.n_units"] = settings["units"], corpus.n_units()
    report["units.per_second"] = round(sum(len(merged[r["id"]]) for r in rows) / sum(len(w) for w in wavs) * 16000, 2)
    print(f"units: PNMI on the unseen voice {report.get('units.pnmi')}; one sentence in two voices: unit-bigram "
          f"overlap {report.get('units.cross_voice_same_text')} (two sentences: {report.get('units.cross_voice_other_text')})")


def phone_error_rate(utterances, names):
    """utterances: (phone ids per frame (T,), the text's pronunciation "pau m ay ...") -> edits between the
    recognised phones and the pronounced ones, repeats merged and pauses left out, over the pronounced."""
    def spoken(phones):  # repeats merged, then pauses dropped
        return [p for i, p in enumerate(phones) if p != "pau" and (i == 0 or p != phones[i - 1])]
    return unit_edit_distance([spoken(said.split()) for _, said in utterances],
                              [spoken([names[int(u)] for u in frames]) for frames, _ in utterances])


def learn_phone_units(args, settings, train_rows, wavs, corpus_rows):
    """The toy's ears: a phone recogniser, from festival's alignments and forced alignment (phones.py).
    -> (the corpus's phones per frame, as heard; the recogniser)"""
    labels = [frame_phones(read_segs(args.data / r["alignment"]), n_frames(w)) if r.get("alignment") else None
              for w, r in train_rows]
    if not any(labels) or not all(r.get("phones") for _, r in train_rows):
        raise UserError("phone units need phone alignments for some training voices and a 'phones' field (the "
                        "text's pronunciation) on every training utterance; or use --set units=hubert")
    features = [normalised_mfcc(w) for w in tqdm(wavs, desc="MFCC")]
    train_features = [f for f, r in zip(features, corpus_rows) if r["split"] == "train"]
    pronunciations = [r["phones"].split() for _, r in train_rows]
    # Speed-perturbed copies of the training speech: no alignment of their own, round 2 force-aligns them.
    speeds = settings["phone_speeds"]
    train_features += [normalised_mfcc(speed_perturbed(w, speed)) for speed in speeds
                       for w, _ in tqdm(train_rows, desc=f"MFCC at speed {speed}")]
    labels, pronunciations = labels + [None] * len(speeds) * len(train_rows), pronunciations * (1 + len(speeds))
    recognizer = train_phone_recognizer(train_features, labels, pronunciations,
                                        PhoneRecognizerConfig(**settings["phone_recognizer"]),
                                        epochs=settings["phone_epochs"], seed=args.seed, device=args.device)
    recognizer.save_pretrained(args.out / "phones")
    print("units: recognising the corpus")
    return recognizer.hear(wavs, features, progress=True), recognizer


def warped_hearing(args, settings, recognizer, wavs, rows, frame_units):
    """The units the LM learns from: the corpus's `frame_units`, but a share of the training speech heard again.

    The LM learns to read the ears' units from training speech they hear well, and is tested on voices
    they mishear. So a share of its training speech (not the answer voice's: TTS targets and spoken
    answers stay as heard) is heard as if another vocal tract had spoken it: filterbank warped, heard
    once, the picked utterances taking the warps in turn (a longer vocal tract, a shorter one, ...). Its
    units then carry errors much like a new voice's (README, "Speech to units")."""
    share, warps = settings["warped_hearing"]["share"], settings["warped_hearing"]["warps"]
    rng = random.Random(args.seed)
    warped = [i for i, r in enumerate(rows) if r["split"] == "train" and r["voice"] != settings["answer_voice"]
              and rng.random() < share]
    if not warped:
        return frame_units
    print(f"units: {len(warped)} training utterances heard again, filterbank warped {' or '.join(map(str, warps))}")
    features = [normalised_mfcc(wavs[i], warps[n % len(warps)]) for n, i in enumerate(tqdm(warped, desc="MFCC, warped"))]
    heard = dict(zip(warped, recognizer.recognize(features)))
    return [heard.get(i, units) for i, units in enumerate(frame_units)]


def learn_hubert_units(args, settings, train_wavs, wavs, rows, report):
    """HuBERT's pretraining iterations on MFCC k-means targets, then k-means on the chosen layer."""
    config = HubertConfig.from_preset(settings["hubert_preset"], num_clusters=settings["n_units"])
    result = train_unit_encoder(train_wavs, config, n_units=settings["n_units"], steps=settings["hubert_steps"],
                                target_layer=settings["target_layer"], unit_layer=settings["unit_layer"],
                                seed=args.seed, bf16=fast_bfloat16(resolve_device(args.device)), device=args.device)
    encoder, layer, kmeans = result["encoder"], result["layer"], result["kmeans"]
    encoder.save_pretrained(args.out / "hubert")
    kmeans.save_pretrained(args.out / "kmeans")
    (args.out / "hubert" / "unit_layer.json").write_text(json.dumps({"layer": layer}))
    picked = [i for i, r in enumerate(rows) if r["split"] == "test_unseen_voice" and r.get("alignment")]
    if picked:  # the baseline HuBERT must beat: k-means of MFCCs
        mfcc_units = [result["mfcc_kmeans"].assign(mfcc_features(wavs[i])) for i in picked]
        report["units.pnmi_mfcc"] = round(score_units(mfcc_units, [args.data / rows[i]["alignment"] for i in picked])["pnmi"], 4)
    report["units.layer"] = layer
    report["units.hubert_final_loss"] = [round(sum(l[-10:]) / len(l[-10:]), 4) for l in result["losses"]]
    print("units: encoding the corpus")
    return speech_to_units(wavs, encoder, layer, kmeans, progress=True, device=args.device), None


# ----------------------------------------------------------------------------- vocoder: units -> speech

def vocoder_data(args, rows, units, durations):
    try:
        return vocoder_items(args.data, rows, units, durations)
    except AudioError as error:
        raise UserError(str(error)) from None


def step_vocoder(args, settings, report, corpus):
    """The mel vocoder: learns to speak the run's units in the answer voice, from that voice's training speech."""
    voice = settings["answer_voice"]
    train_rows = [r for r in in_split(corpus.rows, "train") if r["voice"] == voice]
    if not train_rows:
        raise UserError(f"{args.data}/manifest.jsonl has no training utterances of the answer voice {voice!r}")
    vocoder = MelVocoder(MelVocoderConfig.from_preset(settings["vocoder_preset"], num_embeddings=corpus.n_units()))
    print(f"vocoder: {sum(p.numel() for p in vocoder.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_rows)} training utterances of {voice}")
    items = vocoder_data(args, train_rows, corpus.units(), corpus.units("durations"))
    history = train_mel_vocoder(vocoder, items, seed=args.seed, device=args.device, **settings["vocoder"])
    vocoder.save_pretrained(args.out / "vocoder")
    report["vocoder.final_train_mel_l1"] = round(sum(h["mel"] for h in history[-20:]) / len(history[-20:]), 4)


# ----------------------------------------------------------------------------- eval: the whole run, held out

ARITHMETIC = ("plus", "minus")  # tiny_data's skills whose answers can be computed, not only looked up


def step_eval(args, settings, report, corpus):
    """Held-out evaluation of the whole run: nothing here was trained on."""
    units = corpus.units()
    try:  # ASR and TTS are stage 2's tasks; stage 3's adapter answers everything as a chain
        stage2, sgpt = (SpeechGPT.from_run(args.out, device=args.device, adapter=a) for a in (False, True))
    except PipelineError as error:
        raise UserError(str(error)) from None
    limit, voice = settings["eval_tokens"], settings["answer_voice"]
    # ASR on held-out sentences: the seen voices' readings, and the unseen voice's.
    seen, answer_voice_readings = corpus.sentences("test", voice)
    unseen, _ = corpus.sentences("test_unseen_voice", voice)
    for rows, suffix in ((seen, ""), (unseen, "_unseen_voice")):
        if rows:
            items = [(units[r["id"]], r["text"]) for r in evenly_spaced(rows, settings["eval_sentences"])]
            asr = evaluate_asr(stage2, items, limit["asr"])
            report[f"stage2.asr_wer{suffix}"], report[f"stage2.asr_cer{suffix}"] = round(asr["wer"], 4), round(asr["cer"], 4)
    # TTS of held-out sentences, against the answer voice's reading of them.
    if answer_voice_readings:
        items = [(r["text"], units[r["id"]]) for r in evenly_spaced(answer_voice_readings, settings["eval_sentences"])]
        tts = evaluate_tts(stage2, items, limit["tts"])
        report["stage2.tts_unit_edit_distance"] = round(tts["unit_edit_distance"], 4)
        report["stage2.tts_whisper_wer"] = rounded(speech_whisper_wer(stage2, tts["answer_units"], [t for t, _ in items]))
    # Spoken questions about known facts in held-out phrasings: seen voices, and the unseen voice.
    for audio_split, suffix in (("test", ""), ("test_unseen_voice", "_unseen_voice")):
        items = corpus.spoken_questions("test", audio_split, units)
        if items:
            asked = evenly_spaced(items, settings["eval_spoken_questions"])
            chain = evaluate_chain(sgpt, asked, limit["chain"])
            for key in ("answer_accuracy", "transcript_wer", "speech_answer_unit_edit_distance", "well_formed", "n"):
                report[f"stage3.{key}{suffix}"] = round(chain[key], 4)
            report[f"stage3.speech_answer_whisper_wer{suffix}"] = rounded(
                speech_whisper_wer(sgpt, chain["answer_units"], [answer for _, _, answer, _ in asked]))
    # Spoken questions about facts that only the text corpus (stage 0) stated: does text knowledge reach speech?
    # Sums and differences can be worked out with the skill the training pairs teach, without the fact;
    # the lookups (an animal's sound, an opposite, ...) only the text can have taught: scored apart too.
    # Each knowledge question is decoded once; the lookups' accuracy is taken from the same answers.
    lookups = {question for question, _ in corpus.typed_questions("test_knowledge", ARITHMETIC)}

    def score_knowledge(key, lookup_key, questions, answers, said):  # questions, true answers, the model's
        report[f"stage3.{key}"] = round(exact_match_accuracy(answers, said), 4)
        looked_up = [(a, s) for q, a, s in zip(questions, answers, said) if q in lookups]
        if looked_up:
            report[f"stage3.{lookup_key}"] = round(exact_match_accuracy(*zip(*looked_up)), 4)

    for audio_split, suffix in (("test_knowledge", ""), ("test_unseen_voice", "_unseen_voice")):
        items = corpus.spoken_questions("test_knowledge", audio_split, units)
        if items:
            said = evaluate_chain(sgpt, items, limit["chain"], speech_answer=False)["text_answers"]
            score_knowledge(f"knowledge_accuracy{suffix}", f"knowledge_lookup_accuracy{suffix}",
                            [q for _, q, _, _ in items], [a for _, _, a, _ in items], said)
    # The same questions typed.
    typed = evenly_spaced(corpus.typed_questions("test"), settings["eval_typed_questions"])
    if typed:
        report["stage3.text_answer_accuracy"] = round(evaluate_text_questions(sgpt, typed, limit["chain"]), 4)
    typed = evenly_spaced(corpus.typed_questions("test_knowledge"), settings["eval_typed_questions"])
    if typed:
        score_knowledge("knowledge_text_accuracy", "knowledge_lookup_text_accuracy", [q for q, _ in typed],
                        [a for _, a in typed], text_answers(sgpt, typed, limit["chain"]))
    evaluate_vocoder_on_test(args, sgpt, evenly_spaced(answer_voice_readings, settings["eval_sentences"]), units,
                             corpus.units("durations"), report)
    if not whisper_available():
        print(f"eval: {WHISPER_MISSING}")


def evaluate_vocoder_on_test(args, sgpt, test_rows, units, durations, report):
    """What a listener hears: held-out utterances of the answer voice resynthesised from their units
    (mel L1, real-time factor, re-encoded units, Whisper WER next to the original audio's)."""
    if sgpt.vocoder is None or not test_rows:
        return
    scores = evaluate_vocoder_speech(sgpt.vocoder, vocoder_data(args, test_rows, units, durations),
                                     [r["text"] for r in test_rows], sgpt.speech_to_units)
    report.update({f"vocoder.{key}": rounded(value) for key, value in scores.items()})
    report["vocoder.n"] = len(test_rows)


def rounded(value):
    return None if value is None else round(value, 4)
