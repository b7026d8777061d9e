"""Attribution heads: learned maps applied to frozen features before cosine retrieval."""

from genattr.heads.networks import HEADS, ChannelHead, LinearHead, create_head, head_from_state_dict

__all__ = ["HEADS", "ChannelHead", "LinearHead", "create_head", "head_from_state_dict"]
