"""Attacks on the privacy plug-ins, driven through the real client code as the
adversary would (issue 14): each shows the attack fails, and works with the defence off."""
