"""tokenrm.training: synthetic minimal-edit data, token labels, and the token reward model."""
