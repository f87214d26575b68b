"""The modelling code written beside an exported classifier whose head no stock transformers class computes
(mean pooling, or the [CLS] token without BERT's pooler): a config and a model class that subclass the stock
ones, reuse the stock encoder and add sft_jax's pooling and linear head. `trust_remote_code=True` loads them
(config.json's `auto_map` names them)."""

from __future__ import annotations

import dataclasses
import pathlib

CONFIG_FILE, MODELING_FILE = "configuration_sft_jax.py", "modeling_sft_jax.py"


@dataclasses.dataclass(frozen=True)
class Family:
    """Where transformers keeps one encoder family, and how its classifier is called."""

    name: str  # class name stem: SftJax{name}Config, SftJax{name}For...
    module: str  # transformers.models.X.modeling_X / configuration_X stem
    config: str
    pretrained: str
    encoder: str
    attr: str  # the encoder's attribute (= the stock base_model_prefix, so tensor names are the stock ones)
    encoder_kwargs: str  # extra constructor arguments of the encoder
    image: bool = False

    @property
    def model_type(self) -> str:
        return f"sft_jax_{self.module}"

    @property
    def head_class(self) -> str:
        task = "ImageClassification" if self.image else "SequenceClassification"
        return f"SftJax{self.name}For{task}"


FAMILIES = {
    "bert": Family("Bert", "bert", "BertConfig", "BertPreTrainedModel", "BertModel", "bert",
                   ", add_pooling_layer=False"),
    "roberta": Family("Roberta", "roberta", "RobertaConfig", "RobertaPreTrainedModel", "RobertaModel", "roberta",
                      ", add_pooling_layer=False"),
    "xlm-roberta": Family("XLMRoberta", "xlm_roberta", "XLMRobertaConfig", "XLMRobertaPreTrainedModel",
                          "XLMRobertaModel", "roberta", ", add_pooling_layer=False"),
    "modernbert": Family("ModernBert", "modernbert", "ModernBertConfig", "ModernBertPreTrainedModel",
                         "ModernBertModel", "model", ""),
    "vit": Family("ViT", "vit", "ViTConfig", "ViTPreTrainedModel", "ViTModel", "vit", ", add_pooling_layer=False",
                  image=True),
}

_CONFIG = '''"""Config of a classifier fine-tuned with sft_jax: the stock {config} plus how the head pools."""

from transformers.models.{module}.configuration_{module} import {config}


class SftJax{name}Config({config}):
    model_type = "{model_type}"

    def __init__(self, pooling="mean", head_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling  # "cls": the first token's final hidden state; "mean": {mean_of}
        self.head_dropout = head_dropout
'''

_POOL_TEXT = '''        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # the mean over real tokens, clamped so an all-pad row gives zeros
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            mask = mask.to(torch.float32).unsqueeze(-1)
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)'''

_POOL_IMAGE = '''        pooled = hidden[:, 0] if self.config.pooling == "cls" else hidden[:, 1:].float().mean(1)'''

_MODELING = '''"""A classifier fine-tuned with sft_jax: the stock {encoder}, {pooling_doc}, dropout, a linear head."""

import torch
from torch import nn
from transformers.modeling_outputs import {output}
from transformers.models.{module}.modeling_{module} import {encoder}, {pretrained}

from .configuration_sft_jax import SftJax{name}Config


class {head_class}({pretrained}):
    config_class = SftJax{name}Config

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.{attr} = {encoder}(config{encoder_kwargs})
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, {inputs}, labels=None, **kwargs):
        kwargs.pop("return_dict", None)
        kwargs.pop("token_type_ids", None)  # sft_jax trains with every token of type 0, the encoder's default
        hidden = self.{attr}({call}, **kwargs)[0]
{pool}
        logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return {output}(loss=loss, logits=logits)
'''


def write(out: pathlib.Path, family: Family) -> dict[str, str]:
    """Writes the two code files into `out`; returns config.json's `auto_map`."""
    fields = dataclasses.asdict(family) | {"model_type": family.model_type, "head_class": family.head_class}
    mean_of = "the mean of the patch tokens" if family.image else "the mean of the real tokens"
    (out / CONFIG_FILE).write_text(_CONFIG.format(mean_of=mean_of, **fields))
    if family.image:
        code = dict(inputs="pixel_values=None", call="pixel_values", pool=_POOL_IMAGE,
                    output="ImageClassifierOutput", pooling_doc="the [CLS] or mean-of-patches pooling")
    else:
        call = "input_ids=input_ids, attention_mask=attention_mask"
        inputs = "input_ids=None, attention_mask=None"
        code = dict(inputs=inputs, call=call, pool=_POOL_TEXT, output="SequenceClassifierOutput",
                    pooling_doc="the [CLS] or masked-mean pooling")
    (out / MODELING_FILE).write_text(_MODELING.format(**fields, **code))
    auto = "AutoModelForImageClassification" if family.image else "AutoModelForSequenceClassification"
    return {"AutoConfig": f"{CONFIG_FILE[:-3]}.SftJax{family.name}Config",
            auto: f"{MODELING_FILE[:-3]}.{family.head_class}"}
