"""Model resolution, import and install, and the shared Vosk model with real recognition."""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from voicebot.asr import ModelStore, Recognizer, grammar_phrases, vocabulary_report
from voicebot.config import Config, load_config
from voicebot.errors import ModelMissing, VoicebotError
from voicebot.frames import silence
from voicebot.models import import_model, install, load_catalog, model_problem, resolve
from voicebot.tts import PromptCache

KO = "vosk-model-small-ko-0.22"


def cfg_in(tmp_path: Path, extra: str = "") -> Config:
    """A config whose models/ folder is private to the test (catalog copied from the repo)."""
    from voicebot.config import PROJECT_ROOT

    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "catalog.toml").write_text(
        (PROJECT_ROOT / "models" / "catalog.toml").read_text(encoding="utf-8"), encoding="utf-8")
    conf = tmp_path / "voicebot.toml"
    conf.write_text(f'[paths]\ngrammars = "{PROJECT_ROOT / "grammars"}"\nmodels = "{models}"\n'
                    f"{extra}", encoding="utf-8")
    return load_config(conf)


def test_korean_model_resolves_from_its_python_package(cfg) -> None:  # type: ignore[no-untyped-def]
    loc = resolve(cfg, KO)
    assert loc is not None and loc.source == "package"
    assert model_problem(loc.path) is None
    assert resolve(cfg, "vosk-model-small-tr-0.3") is None
    catalog = load_catalog(cfg)
    assert {"vosk-model-small-en-us-0.15", "vosk-model-small-ru-0.22",
            "vosk-model-small-tr-0.3", KO} <= set(catalog)


def test_import_from_folder_and_zip_then_resolution_order(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = resolve(cfg, KO)
    assert src is not None
    local = cfg_in(tmp_path)
    loc = import_model(local, src.path, name=KO)
    assert loc.path == local.models_dir / "vosk" / KO
    assert resolve(local, KO).source == "project"  # type: ignore[union-attr]
    with pytest.raises(VoicebotError, match="already exists"):
        import_model(local, src.path, name=KO)

    # A zip as downloaded from alphacephei.com: one top folder named after the model.
    zpath = tmp_path / "vosk-model-small-xx-0.1.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for f in src.path.rglob("*"):
            if f.is_file():
                zf.write(f, f"vosk-model-small-xx-0.1/{f.relative_to(src.path)}")
    loc2 = import_model(local, zpath)
    assert loc2.name == "vosk-model-small-xx-0.1" and model_problem(loc2.path) is None
    assert not list((local.models_dir / "vosk").glob(".import-*"))  # no half copies left

    # An explicit path in the config wins over everything else.
    explicit = cfg_in(tmp_path, f'[asr.model_paths]\n"{KO}" = "{loc2.path}"\n')
    assert resolve(explicit, KO).path == loc2.path  # type: ignore[union-attr]


def test_import_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    local = cfg_in(tmp_path)
    folder = tmp_path / "not-a-model"
    (folder / "am").mkdir(parents=True)
    with pytest.raises(VoicebotError, match=r"missing am/final\.mdl"):
        import_model(local, folder)
    bad_zip = tmp_path / "x.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(VoicebotError, match="no Vosk model"):
        import_model(local, bad_zip)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(VoicebotError, match="neither a model folder nor a zip"):
        import_model(local, junk)


def test_install_unknown_name_and_offline_download_say_what_to_do(tmp_path: Path) -> None:
    local = cfg_in(tmp_path)
    with pytest.raises(ModelMissing, match=r"not in models/catalog\.toml"):
        install(local, "vosk-model-does-not-exist")
    try:
        socket.create_connection(("alphacephei.com", 443), timeout=3).close()
        pytest.skip("alphacephei.com is reachable: a real download would start")
    except OSError:
        pass
    with pytest.raises(ModelMissing, match=r"voicebot models import FILE\.zip"):
        install(local, "vosk-model-small-tr-0.3")


def test_model_is_loaded_once_and_shared(core) -> None:  # type: ignore[no-untyped-def]
    store: ModelStore = core.models
    a = store.get(KO)
    b = store.get(KO)
    assert a is b
    assert store.loaded() == [KO]
    assert store.has_unk(KO) is False  # the Korean model's vocabulary has no [unk]
    assert vocabulary_report(a, core.grammars.packs["ko"], core.grammars.menu) == []


def speak(core, text: str, voice: str = "ko", rate: int = 8000) -> np.ndarray:  # type: ignore[no-untyped-def]
    cache = PromptCache(core.cfg.audio_dir / "cache" / "caller", rate, 150, -20.0)
    return np.concatenate([silence(300, rate), cache.get(text, voice), silence(300, rate)])


@pytest.mark.parametrize("rate", [8000, 16000])
def test_grammar_mode_recognises_keyword_and_switches_per_node(core, rate: int) -> None:  # type: ignore[no-untyped-def]
    model = core.models.get(KO)
    pack = core.grammars.packs["ko"]
    rec = Recognizer(model, rate, has_unk=False)
    main_ids = [o.id for o in core.grammars.menu.choices("main")]
    with_decoys = grammar_phrases(pack, main_ids)
    assert "상담원" in with_decoys and "[unk]" not in with_decoys
    assert all(d in with_decoys for d in pack.decoys)
    # Keywords alone here: decoys' effect is measured on whole calls (test_simulator).
    main = grammar_phrases(pack, main_ids, with_decoys=False)
    rec.set_grammar(main)
    audio = speak(core, "상담원", rate=rate)
    for i in range(0, len(audio), rate // 50):  # 20 ms frames
        rec.accept(audio[i:i + rate // 50])
    res = rec.finish()
    assert res.text == "상담원" and res.confidence > 0.5
    assert res.words[0].word == "상담원"
    # The confirm node's grammar has no 상담원: the same audio cannot come out as it.
    rec.set_grammar(grammar_phrases(pack, ["confirm.yes", "confirm.no"]))
    rec.accept(audio)
    assert "상담원" not in rec.finish().text
    # Free mode: the model's whole vocabulary.
    rec.set_grammar(None)
    rec.accept(audio)
    free = rec.finish()
    assert isinstance(free.text, str)
    assert rec.grammar is None


def test_partial_results_while_speaking(core) -> None:  # type: ignore[no-untyped-def]
    rec = Recognizer(core.models.get(KO), 8000)
    rec.set_grammar(grammar_phrases(core.grammars.packs["ko"],
                                    [o.id for o in core.grammars.menu.choices("main")],
                                    with_decoys=False))
    audio = speak(core, "상담원")
    partials = []
    for i in range(0, len(audio), 160):
        rec.accept(audio[i:i + 160])
        partials.append(rec.partial())
    # Partials stream while the caller speaks; with the whole main-menu grammar the
    # model's best guess mid-word can be a neighbour (민원), so only the final is exact.
    assert any(p for p in partials[: len(partials) - 5]), partials
    assert json.dumps(rec.finish().text, ensure_ascii=False) == '"상담원"'
