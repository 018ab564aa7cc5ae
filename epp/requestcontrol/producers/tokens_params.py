"""Parameters of token-producer, in the reference's shape (requestcontrol/dataproducer/
tokenizer Config: modelName and one backend of vllm, estimate, udsTokenizerConfig; inProcess
is this project's), parsed strictly by the framework (epp.framework.params): an unknown key
or a value of the wrong type is refused naming it. What is not built here is refused by
name. The reference's defaults: the vllm backend at DEFAULT_URL, its timeouts in
tokens_render."""

from __future__ import annotations

from dataclasses import dataclass

from epp.units import duration_value

from .tokens_render import DEFAULT_URL, MESSAGES_MODES, RenderSettings

NOT_BUILT = "not built yet"


@dataclass(slots=True)
class VllmParams:
    """The vllm render backend (the reference's vllmConfig); `http` is an older name of `url`."""

    url: str = ""
    http: str = ""
    timeout: float | str | None = None  # a Go duration or seconds; None: tokens_render's default
    mmTimeout: float | str | None = None
    prefillOnly: bool = False
    messagesRenderMode: str = ""  # "" = auto
    caCertPath: str = ""
    clientCertPath: str = ""
    clientKeyPath: str = ""
    insecureSkipVerify: bool = False
    endpointDiscovery: dict | None = None

    def validate(self) -> None:
        self.settings()

    def settings(self) -> RenderSettings:
        """The render client's settings. Raises ValueError naming the key."""
        if self.endpointDiscovery is not None:
            raise ValueError(f"endpointDiscovery: rendering on the discovered endpoints is {NOT_BUILT}; set vllm.url")
        mode = self.messagesRenderMode or "auto"
        if mode not in MESSAGES_MODES:
            raise ValueError(f"messagesRenderMode: must be auto, native or legacy, got {mode!r}")
        url = self.url or self.http or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must be an http:// or https:// URL, got {url!r}")
        if bool(self.clientCertPath) != bool(self.clientKeyPath):
            raise ValueError("clientCertPath: clientCertPath and clientKeyPath must be set together")
        s = RenderSettings(url=url, messages_mode=mode, prefill_only=self.prefillOnly, ca_cert_path=self.caCertPath,
                           client_cert_path=self.clientCertPath, client_key_path=self.clientKeyPath,
                           insecure_skip_verify=self.insecureSkipVerify)
        for key, attr in (("timeout", "timeout"), ("mmTimeout", "mm_timeout")):
            value = getattr(self, key)
            if value is not None:
                seconds = duration_value(value, key, ValueError)
                if seconds <= 0:
                    raise ValueError(f"{key}: must be positive")
                setattr(s, attr, seconds)
        return s


@dataclass(slots=True)
class EstimateParams:
    """The estimate backend; its multimodal settings are not built."""

    image: dict | None = None
    video: dict | None = None
    audio: dict | None = None

    def validate(self) -> None:
        for key in ("image", "video", "audio"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key}: multimodal token estimation is {NOT_BUILT}")


@dataclass(slots=True)
class UdsTokenizerParams:
    """The reference's deprecated udsTokenizerConfig (llm-d-kv-cache UdsTokenizerConfig): its
    sidecar's tokenizer files are loaded in process; the socket is not used."""

    socketFile: str = ""
    useTCP: bool = False
    modelTokenizerMap: dict[str, str] | None = None
    huggingFaceToken: str = ""
    tokenizersCacheDir: str = ""


@dataclass(slots=True)
class InProcessParams:
    """This project's in-process backend: a tokenizer directory, else modelName in the
    Hugging Face cache (hfCacheDir, or the library's own default)."""

    path: str = ""
    hfCacheDir: str = ""


@dataclass(slots=True)
class TokenProducerParams:
    modelName: str = ""
    vllm: VllmParams | None = None
    estimate: EstimateParams | None = None
    udsTokenizerConfig: UdsTokenizerParams | None = None  # deprecated in the reference
    inProcess: InProcessParams | None = None

    def backend(self) -> str:
        """estimate | vllm | uds | inProcess | auto (modelName alone: inProcess when found locally, else vllm)."""
        uds_on = self.udsTokenizerConfig is not None and bool(self.udsTokenizerConfig.socketFile)
        set_ = [k for k, on in (("estimate", self.estimate is not None), ("vllm", self.vllm is not None),
                                ("udsTokenizerConfig", uds_on), ("inProcess", self.inProcess is not None)) if on]
        if len(set_) > 1:
            raise ValueError(f"{set_[1]}: only one of 'estimate', 'vllm', 'udsTokenizerConfig' or 'inProcess' "
                             "may be set")
        if set_:
            return {"udsTokenizerConfig": "uds"}.get(set_[0], set_[0])
        return "auto" if self.modelName else "estimate"

    def validate(self) -> None:
        backend = self.backend()
        if backend in ("vllm", "uds") and not self.modelName:
            raise ValueError(f"modelName: must be specified for the {backend} backend")
        if backend == "inProcess" and not self.inProcess.path and not self.modelName:  # type: ignore[union-attr]
            raise ValueError("inProcess.path: a tokenizer directory (or modelName, looked up in the Hugging Face "
                             "cache) is required")

    def render_settings(self) -> RenderSettings:
        return (self.vllm or VllmParams()).settings()
