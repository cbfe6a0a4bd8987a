"""CLIP text encoders in the layout of transformers' CLIPTextModel and
CLIPTextModelWithProjection: SD1.5's (CLIP ViT-L/14) and SDXL's two (ViT-L/14, OpenCLIP bigG/14).

  input_ids [B, L] -> token embedding + learned position embedding
  -> num_hidden_layers pre-LN blocks: LayerNorm, causal multi-head self-attention, residual;
     LayerNorm, MLP (fc1, quick_gelu x*sigmoid(1.702x) or exact GELU, fc2), residual
  -> final_layer_norm -> last_hidden_state [B, L, hidden_size] (what SD1.5 feeds to the UNet)

SDXL conditions its UNet on the penultimate hidden state (the residual stream after all but the
last layer, before final_layer_norm) of both encoders, concatenated, and on the second encoder's
text_embeds: text_projection (Linear, no bias) of the final_layer_norm output at the EOS token.
See SDXLTextEncoders.

Only the causal mask applies (SD pipelines pass no padding mask). The `position_ids` buffer that
older transformers versions saved is not a parameter here; checkpoint_io drops it on load.
"""

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tools.sd15.config import resolve_text


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        n = x.size(1)
        c = x.size(2)
        d = c // self.heads
        q = (self.q_proj(x) * self.scale).reshape(b, n, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).reshape(b, n, self.heads, d).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, self.heads, d).transpose(1, 2)
        probs = (torch.matmul(q, k.transpose(-1, -2)) + mask).softmax(dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.quick_gelu = quick_gelu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        dim = r["hidden_size"]
        self.self_attn = CLIPAttention(dim, r["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(dim, eps=r["layer_norm_eps"])
        self.mlp = CLIPMLP(dim, r["intermediate_size"], r["hidden_act"] == "quick_gelu")
        self.layer_norm2 = nn.LayerNorm(dim, eps=r["layer_norm_eps"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(r) for _ in range(r["num_hidden_layers"])])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.token_embedding = nn.Embedding(r["vocab_size"], r["hidden_size"])
        self.position_embedding = nn.Embedding(r["max_position_embeddings"], r["hidden_size"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[:input_ids.size(1)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(r)
        self.encoder = CLIPEncoder(r)
        self.final_layer_norm = nn.LayerNorm(r["hidden_size"], eps=r["layer_norm_eps"])

    def causal_mask(self, x: torch.Tensor) -> torch.Tensor:
        """[L, L] additive mask of x [B, L, D]: -inf above the diagonal (no attending ahead)."""
        n = x.size(1)
        return torch.full([n, n], float("-inf"), dtype=x.dtype, device=x.device).triu(1)

    @torch.jit.export
    def hidden_states(self, input_ids: torch.Tensor) -> List[torch.Tensor]:
        """transformers' hidden_states: the embeddings, then the residual stream after each
        layer (num_hidden_layers + 1 tensors [B, L, hidden_size], none after final_layer_norm)."""
        x = self.embeddings(input_ids)
        mask = self.causal_mask(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            states.append(x)
        return states

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        return self.final_layer_norm(self.encoder(x, self.causal_mask(x)))


class CLIPTextModel(nn.Module):
    """forward(input_ids int64 [B, L], L <= max_position_embeddings) -> last_hidden_state
    [B, L, hidden_size]. Build with from_config(config dict)."""

    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.text_model = CLIPTextTransformer(r)

    @staticmethod
    def from_config(cfg: Dict[str, Any]) -> "CLIPTextModel":
        return CLIPTextModel(resolve_text(cfg))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)

    @torch.jit.export
    def penultimate_hidden_state(self, input_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states[-2] [B, L, hidden_size]: what SDXL takes from its first encoder."""
        return self.text_model.hidden_states(input_ids)[-2]


class CLIPTextModelWithProjection(nn.Module):
    """SDXL's second text encoder. forward(input_ids int64 [B, L]) -> (penultimate hidden state
    [B, L, hidden_size], text_embeds [B, projection_dim]). Build with from_config(config dict)."""

    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.text_model = CLIPTextTransformer(r)
        self.text_projection = nn.Linear(r["hidden_size"], r["projection_dim"], bias=False)

    @staticmethod
    def from_config(cfg: Dict[str, Any]) -> "CLIPTextModelWithProjection":
        return CLIPTextModelWithProjection(resolve_text(cfg))

    def forward(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        states = self.text_model.hidden_states(input_ids)
        last = self.text_model.final_layer_norm(states[-1])
        return states[-2], self.text_projection(pooled_output(last, input_ids))


class SDXLTextEncoders(nn.Module):
    """SDXL's prompt conditioning as one module (a bundle's text encoder): forward(input_ids,
    input_ids_2 int64 [B, L]) -> (encoder_hidden_states [B, L, hidden + hidden_2], text_embeds
    [B, projection_dim_2]), as diffusers' StableDiffusionXLPipeline.encode_prompt (no clip skip)
    and DMD2 compute them: both encoders' penultimate hidden states, the first encoder's first,
    and the second encoder's text_embeds.

    input_ids come from `tokenizer` (padded with EOS 49407), input_ids_2 from `tokenizer_2`
    (padded with "!" = id 0); the padding id changes the hidden states after the EOS token.
    """

    def __init__(self, text_encoder: CLIPTextModel,
                 text_encoder_2: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor,
                input_ids_2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        states_2, text_embeds = self.text_encoder_2(input_ids_2)
        states = self.text_encoder.penultimate_hidden_state(input_ids)
        return torch.cat([states, states_2], dim=-1), text_embeds


def sdxl_text_conditioning(text_encoder: CLIPTextModel,
                           text_encoder_2: CLIPTextModelWithProjection, input_ids: torch.Tensor,
                           input_ids_2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDXLTextEncoders(text_encoder, text_encoder_2)(input_ids, input_ids_2)."""
    return SDXLTextEncoders(text_encoder, text_encoder_2)(input_ids, input_ids_2)


def pooled_output(last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIPTextModel's pooler_output: the hidden state at the first EOS token, which has the
    largest id in CLIP's vocabulary (argmax of input_ids, as transformers does for configs with
    eos_token_id 2, SD1.5's and SDXL's). SD1.5 does not use it; SDXL projects the second
    encoder's (CLIPTextModelWithProjection)."""
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    return last_hidden_state[rows, input_ids.argmax(dim=-1)]
