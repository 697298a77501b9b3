"""chatmask: fine-tune chat LLMs with the loss on the assistant's tokens only."""

from .errors import ChatmaskError, ChatmaskWarning, ConfigError, ConversationError, TemplateError
from .hub import load_tokenizer
from .labels import IGNORE, Example, check_template, encode, encode_turns
from .templates import add_template_tokens

__all__ = [
    "IGNORE",
    "ChatmaskError",
    "ChatmaskWarning",
    "ConfigError",
    "ConversationError",
    "Example",
    "TemplateError",
    "add_template_tokens",
    "check_template",
    "encode",
    "encode_turns",
    "load_tokenizer",
]
__version__ = "0.1.0"
