"""The paper's analysis: figures from run directories."""
