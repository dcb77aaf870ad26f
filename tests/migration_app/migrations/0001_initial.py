from django.db import migrations, models
from django.db.models import Q


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Shelf",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        verbose_name="ID",
                    ),
                ),
                ("code", models.CharField(max_length=20, unique=True)),
            ],
        ),
        migrations.CreateModel(
            name="Widget",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        verbose_name="ID",
                    ),
                ),
                ("sku", models.CharField(max_length=30, unique=True)),
                ("label", models.CharField(max_length=50, db_index=True)),
                ("size", models.IntegerField()),
                (
                    "shelf",
                    models.ForeignKey(
                        on_delete=models.deletion.CASCADE, to="migration_app.shelf"
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["size"], name="widget_size_idx")],
                "constraints": [
                    models.CheckConstraint(
                        condition=Q(size__gte=0), name="widget_size_gte_0"
                    ),
                    models.UniqueConstraint(
                        fields=["label", "size"], name="widget_label_size_uniq"
                    ),
                ],
                "unique_together": {("sku", "label")},
            },
        ),
    ]
