"""The state after 0003 (makemigrations stays clean with the app installed)."""

from django.db import models
from django.db.models import Q


class Rack(models.Model):
    code = models.CharField(max_length=20, unique=True)

    def __str__(self) -> str:
        return self.code


class Widget(models.Model):
    sku = models.CharField(max_length=30)
    title = models.CharField(max_length=50)
    size = models.IntegerField()
    rack = models.ForeignKey(Rack, on_delete=models.CASCADE, db_constraint=False)

    class Meta:
        indexes = [
            models.Index(fields=["size"], name="widget_size_renamed_idx"),
            models.Index(fields=["sku", "size"], name="widget_sku_size_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(size__gt=0), name="widget_size_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.sku
