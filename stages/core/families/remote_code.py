"""Decoder with a different number of attention heads and MLP channels in every layer.

This file is copied next to the weights of every model that Bonsai exports, as
``modeling_bonsai.py``, so that ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` builds the pruned model with nothing but torch and transformers
installed.  Stock configs cannot express per-layer sizes, so the config adds three fields:

- ``layer_num_key_value_heads``: key/value heads kept in each layer (query heads are this
  times the parent's query heads per KV head, since heads are pruned by whole group);
- ``layer_intermediate_sizes``: MLP channels kept in each layer;
- ``bonsai_layout``: the module names of the family (which projections to resize);
- ``bonsai_output_biases`` (when present): output projections given a bias by the repair
  where the parent has none (its mean compensation), in every layer.

The classes subclass the parent family's own config and model, so everything else
(rotary embeddings, norms, caches, ``generate()``) is the stock implementation.  The only
line that differs between families is ``BASE_MODEL_TYPE``, rewritten at export.
"""

import warnings

import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseForCausalLM = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class BonsaiConfig(_BaseConfig):
    model_type = "bonsai_" + BASE_MODEL_TYPE

    def __init__(
        self,
        layer_num_key_value_heads=None,
        layer_intermediate_sizes=None,
        bonsai_layout=None,
        bonsai_output_biases=None,
        **kwargs,
    ):
        self.layer_num_key_value_heads = layer_num_key_value_heads
        self.layer_intermediate_sizes = layer_intermediate_sizes
        self.bonsai_layout = bonsai_layout
        self.bonsai_output_biases = bonsai_output_biases
        super().__init__(**kwargs)


class EmptyAttention(nn.Module):
    """An attention block whose every head was pruned: it adds only the output bias.

    It keeps zero-width projections so that parameter names match the other layers, and
    still appends (empty) keys and values to the cache so that the cache's sequence length
    stays right when this is the first layer.
    """

    def __init__(self, hidden_size, head_dim, layer_idx, layout, biases):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self._out = layout["attention_out"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in list(layout["query"]) + list(layout["key_value"]):
                setattr(self, name, nn.Linear(hidden_size, 0, bias=biases[name]))
            setattr(self, self._out, nn.Linear(0, hidden_size, bias=biases[self._out]))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        if past_key_values is not None:
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return getattr(self, self._out)(hidden_states[..., :0]), None


def get_module(root, dotted):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shrink_layers(model, config):
    """Replace each layer's projections with empty ones of that layer's pruned sizes.

    Used while loading: from_pretrained builds the model on the meta device, so the
    full-size modules built by the parent class cost nothing before they are replaced.
    """
    layout = config.bonsai_layout
    hidden, head_dim = config.hidden_size, head_dim_of(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    layers = get_module(model, layout["layers"])
    added = set(getattr(config, "bonsai_output_biases", None) or ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element tensors warn on init
        for index, layer in enumerate(layers):
            groups = config.layer_num_key_value_heads[index]
            attention = get_module(layer, layout["attention"])
            biases = {
                n: getattr(attention, n).bias is not None or n in added
                for n in list(layout["query"]) + list(layout["key_value"]) + [layout["attention_out"]]
            }
            if groups == 0:
                setattr(layer, layout["attention"], EmptyAttention(hidden, head_dim, index, layout, biases))
            else:
                for name in layout["query"]:
                    setattr(attention, name, nn.Linear(hidden, groups * per_group * head_dim, bias=biases[name]))
                for name in layout["key_value"]:
                    setattr(attention, name, nn.Linear(hidden, groups * head_dim, bias=biases[name]))
                out = layout["attention_out"]
                setattr(attention, out, nn.Linear(groups * per_group * head_dim, hidden, bias=biases[out]))
            channels = config.layer_intermediate_sizes[index]
            mlp = get_module(layer, layout["mlp"])
            for name in layout["mlp_in"]:
                old = getattr(mlp, name)
                setattr(mlp, name, nn.Linear(hidden, channels, bias=old.bias is not None))
            old = getattr(mlp, layout["mlp_out"])
            bias = old.bias is not None or layout["mlp_out"] in added
            setattr(mlp, layout["mlp_out"], nn.Linear(channels, hidden, bias=bias))


class BonsaiForCausalLM(_BaseForCausalLM):
    config_class = BonsaiConfig

    def __init__(self, config):
        super().__init__(config)
        shrink_layers(self, config)
