"""Operator control plane: signed policy, data-subject rights, audit, metrics."""
